CREATE DATABASE cosell_state OWNER airflow;
